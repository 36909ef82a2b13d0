from scaleset.cli import main

raise SystemExit(main())
