"""fedsec secure aggregation in a Flower app: LoRA fine-tuning across the embedded institutions."""
