from sfr import main

main()
