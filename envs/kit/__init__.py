"""The shared kernel every envctl package builds on: settings, database, errors, ids, clock."""
