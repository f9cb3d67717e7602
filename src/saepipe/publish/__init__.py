"""Publishing exported SAEs (the Hugging Face hub)."""
