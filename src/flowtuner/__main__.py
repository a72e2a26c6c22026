from flowtuner.cli import main

raise SystemExit(main())
