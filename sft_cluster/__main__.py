from sft_cluster.cli import main

main()
