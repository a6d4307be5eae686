"""envs.packages without Docker: dpkg's status, METADATA headers, site-packages archives, diffs."""

from __future__ import annotations

import io

from envs.packages import (
    Package,
    Packages,
    diff,
    kept_packages,
    parse_dpkg_status,
    parse_metadata,
    python_dirs,
    python_packages_in,
)
from tests.envs.archive_samples import layer

STATUS = """\
Package: bash
Status: install ok installed
Priority: required
Architecture: amd64
Version: 5.2.15-2+b2
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.
 .
 Version: 9.9 (a continuation line, not a field)

Package: nano
Status: deinstall ok config-files
Architecture: amd64
Version: 7.2-1

Package: broken
Status: install ok installed
Architecture: amd64

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9

Package: libc6
Status: install ok installed
Architecture: i386
Multi-Arch: same
Version: 2.36-9

Package: python3
Status: install ok installed
Architecture: amd64
Version: 3.11.2-1+b1
"""


def test_dpkg_status_gives_installed_packages_only_with_their_versions() -> None:
    assert parse_dpkg_status(STATUS) == [
        Package("bash", "5.2.15-2+b2"),
        Package("libc6:amd64", "2.36-9"),
        Package("libc6:i386", "2.36-9"),
        Package("python3", "3.11.2-1+b1"),
    ]


def test_an_empty_or_garbled_status_file_has_no_packages() -> None:
    assert parse_dpkg_status("") == []
    assert parse_dpkg_status("\n\n  stray continuation\nno colon here\n") == []


def test_metadata_headers_give_the_name_and_version_and_the_body_is_not_read() -> None:
    text = "Metadata-Version: 2.1\nName: jupyter_core\nVersion: 4.12.0\nSummary: Jupyter\n  core\n\nName: other\n"
    assert parse_metadata(text) == Package("jupyter_core", "4.12.0")


def test_metadata_without_a_version_or_a_name_is_no_package() -> None:
    assert parse_metadata("Metadata-Version: 2.1\nName: foo\n") is None
    assert parse_metadata("Version: 1.0\n") is None
    assert parse_metadata("\nName: after-a-blank-line\nVersion: 1\n") is None


def _site_packages(files: dict[str, bytes]) -> io.BytesIO:
    return io.BytesIO(layer(files))


def test_a_site_packages_archive_gives_dist_info_and_egg_info_distributions_only() -> None:
    archive = _site_packages(
        {
            "dist-packages/ipykernel-6.17.0.dist-info/METADATA": b"Name: ipykernel\nVersion: 6.17.0\n",
            "dist-packages/ipykernel-6.17.0.dist-info/RECORD": b"Name: not-this\nVersion: 1\n",
            "dist-packages/Pygments-2.14.0.egg-info/PKG-INFO": b"Name: Pygments\nVersion: 2.14.0\n",
            "dist-packages/six-1.16.0.egg-info": b"Name: six\nVersion: 1.16.0\n",
            "dist-packages/vendored/x.dist-info/METADATA": b"Name: deep\nVersion: 1\n",
            "dist-packages/nover-1.dist-info/METADATA": b"Name: nover\n",
            "dist-packages/ipykernel/__init__.py": b"Name: code\nVersion: 0\n",
        }
    )
    assert sorted(python_packages_in(archive)) == [
        Package("Pygments", "2.14.0"),
        Package("ipykernel", "6.17.0"),
        Package("six", "1.16.0"),
    ]


def test_a_cut_off_archive_keeps_what_was_read() -> None:
    whole = _site_packages({"sp/a-1.dist-info/METADATA": b"Name: a\nVersion: 1\n", "sp/big": b"x" * 100_000})
    cut = io.BytesIO(whole.getvalue()[:5000])
    assert python_packages_in(cut) == [Package("a", "1")]


def test_python_dirs_are_narrowed_to_the_python_versions_debian_installed() -> None:
    dirs = python_dirs([Package("python3.11", "3.11.2-6")])
    assert "/usr/lib/python3/dist-packages" in dirs
    assert "/usr/local/lib/python3.11/dist-packages" in dirs
    assert "/opt/venv/lib/python3.11/site-packages" in dirs
    assert not any("python3.12" in d for d in dirs)
    assert "/usr/local/lib/python3.12/site-packages" in python_dirs([])


def test_the_difference_has_added_removed_and_changed_packages_and_python_names_compare_as_pip_does() -> None:
    old = Packages(
        deb=[Package("bash", "5.2"), Package("nano", "7.2"), Package("python3", "3.11.2")],
        python=[Package("Jupyter_Core", "4.12.0"), Package("pip", "23.0")],
    )
    new = Packages(
        deb=[Package("bash", "5.2"), Package("python3", "3.11.4"), Package("vim", "9.0")],
        python=[Package("jupyter-core", "5.0.0"), Package("pip", "23.0"), Package("ipykernel", "6.17.0")],
    )
    found = diff(old, new)
    assert found["deb"].added == [Package("vim", "9.0")]
    assert found["deb"].removed == [Package("nano", "7.2")]
    assert [(c.name, c.old, c.new) for c in found["deb"].changed] == [("python3", "3.11.2", "3.11.4")]
    assert found["python"].added == [Package("ipykernel", "6.17.0")]
    assert found["python"].removed == []
    assert [(c.name, c.old, c.new) for c in found["python"].changed] == [("jupyter-core", "4.12.0", "5.0.0")]


def test_packages_survive_their_json_form() -> None:
    packages = Packages(deb=[Package("bash", "5.2")], python=[Package("pip", "23.0")])
    assert Packages.from_json(packages.to_json()) == packages


def test_an_over_long_name_or_version_in_an_image_is_cut() -> None:
    package = parse_metadata(f"Name: {'n' * 5000}\nVersion: {'1' * 5000}\n")
    assert package is not None and len(package.name) == 200 and len(package.version) == 100


def test_packages_are_known_from_a_versions_labels_only_once_kept() -> None:
    packages = Packages(deb=[Package("bash", "5.2")], python=[])
    assert kept_packages({"packages": packages.to_json()}) == packages
    assert kept_packages({"envctl.base-image": "bash"}) is None
    assert kept_packages(None) is None
