"""Tests of saves (runner/saves/): snapshots, lean and scanned layers, in-runtime saves, drafts, archives."""
