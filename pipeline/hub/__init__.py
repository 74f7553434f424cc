"""Publishing: the Hugging Face Hub client (client), the publish gate's checks (gate), facts about
this repository (repo_facts: git, DVC hashes), and the cards (modelcard, card_text, dataset_card).
May import pipeline.core and pipeline.rows."""
