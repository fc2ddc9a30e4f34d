"""What a run shows people: tables, the HTML page, the geometry page, what each answer did."""
