from imgguard.cli import main

raise SystemExit(main())
