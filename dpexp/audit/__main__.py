"""``python -m dpexp.audit [overrides]`` (docs/audit.md)."""

from dpexp.audit.run import main

main()
