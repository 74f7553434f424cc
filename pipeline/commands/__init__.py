"""Commands for people, beside the stages: `tuneline questions draft` (questions), `tuneline review
export|apply|serve` (review, review_server and the page in review_static/), `tuneline chat` and
`compare` (chat), `tuneline doctor` (doctor). May import every layer, never a stage module."""
