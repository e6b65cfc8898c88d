"""``agents list``: placeholder until agent definitions land (see keel.agents)."""
