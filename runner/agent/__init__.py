"""The in-container agent. Standard library only: it runs on any image with python3."""
