from trainer_svc.server import main

main()
