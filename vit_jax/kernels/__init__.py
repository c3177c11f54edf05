"""Optional custom calls for products a backend's compiler runs slowly."""
