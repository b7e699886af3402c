import os

from servetool.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
