"""kvsvr: a distributed, strongly consistent key-value store."""
