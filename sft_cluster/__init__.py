"""sft-cluster: supervised fine-tuning launcher."""
