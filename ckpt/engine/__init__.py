"""Planning and executing I/O: save and restore planners (pure), writer assignment (pure), and the one executor that does the reads and writes under a byte budget."""
