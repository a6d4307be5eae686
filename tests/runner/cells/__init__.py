"""Tests of cells (runner/cells/): executions, outputs, results, notebooks."""
