from sqdf_fast.bbo.loop import main

main()
