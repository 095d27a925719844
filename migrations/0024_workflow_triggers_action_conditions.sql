-- Conditional actions take a CEL `if` over the finished run (issue 15: "complex condition
-- expressions"): the action fires when its trigger holds and the expression is true.
ALTER TABLE event_actions ADD COLUMN if_expr text CHECK (length(if_expr) BETWEEN 1 AND 4096);
