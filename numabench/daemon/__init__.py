"""`numabench serve`: the plan's instances kept warm, requests routed by sequence length."""
