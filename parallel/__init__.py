"""Distribution mechanics (launch detection, mesh, Ulysses, FSDP2 loading, CFG exchange); knows nothing of Wan."""
