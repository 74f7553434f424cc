"""Dataset rows as files: JSONL reading with line-numbered errors and atomic writes (jsonl), the
layouts people import (formats), the one near-duplicate measure (neardup), and expert corrections
(corrections). May import pipeline.core only."""
