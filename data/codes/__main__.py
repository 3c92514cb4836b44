from data.codes.encode import main

raise SystemExit(main())
