from sq_export.cli import main

raise SystemExit(main())
