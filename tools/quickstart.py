"""The README's main job (same as the ``blvit-quickstart`` command)."""
from blvit_apps.quickstart import main

if __name__ == "__main__":
    main()
