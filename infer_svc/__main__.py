from infer_svc.server import main

main()
