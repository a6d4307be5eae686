"""Mounts of a runtime: a git repository, an S3 bucket or prefix, or a team's named volume, each
at a target directory of the container.

- validate.py: what a ``mounts`` setting may hold (R28, R29), pure but for one DNS lookup per
  git host; nothing else here runs before it;
- volumes.py: named persistent volumes (Docker volumes carrying the installation's labels);
- git.py: the shared clone cache and the checkout of a ref per commit, run with a fixed argv;
- s3.py: the ETag-aware download cache (and the write-back on stop);
- cache.py: the lock the caches share;
- prepare.py: what a boot does with a runtime's mounts (downloads, progress, binds, record);
- streamed.py: the prepared trees sent into a runtime whose container cannot bind this host's
  directories (Swarm), over the agent channel.
"""
