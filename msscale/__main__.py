from msscale.cli import main

raise SystemExit(main())
