-- The schema is Sydent's: there is nothing to take back without losing an operator's data.
SELECT 1;
