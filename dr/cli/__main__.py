import sys

from dr.cli import main

main()
sys.exit(0)
