"""Provider-layer tests: real SDKs against local fake servers, plus pricing and tiers."""
