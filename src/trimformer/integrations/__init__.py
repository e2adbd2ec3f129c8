"""Optional integrations with other toolkits (each imports its toolkit lazily)."""
