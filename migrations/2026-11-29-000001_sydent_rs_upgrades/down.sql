DROP TABLE IF EXISTS sydent_rs_upgrades;
