"""The command-line tools (each a script: ``python tools/<name>.py --help``). A package so that one
tool reuses another's functions by name (``from tools import benchmark``, with the repository root
on ``sys.path`` as every tool puts it); nothing here is part of the installed library."""
