"""Cells: code run in a runtime, its outputs stored and streamed live, its result files kept.

``store.py`` alone writes executions, their outputs and result files; ``executions.py`` takes
cells in and follows them; ``workers.py`` runs a runtime's cells in order; ``streams.py`` holds
what is known of running cells and who listens; ``results.py`` collects files cells write under
/results (``result_files.py``: the scan; ``result_stores.py``: where they are kept; ``result_remote.py``:
a runtime's /results fetched over its agent channel when the backend has no host paths).
"""
