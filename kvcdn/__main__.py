from kvcdn.cli import main

raise SystemExit(main())
