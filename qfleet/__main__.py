from qfleet.cli import main

raise SystemExit(main())
