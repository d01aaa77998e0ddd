DROP TABLE IF EXISTS directory_mirror;
