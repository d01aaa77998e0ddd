DROP TABLE IF EXISTS replication_origin_marks;
