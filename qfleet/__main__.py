from qfleet.cli import main

if __name__ == "__main__":  # not when a spawned worker imports this as __mp_main__
    raise SystemExit(main())
