-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d):
-- each service's own database, owned by the application role. The services migrate them.
CREATE DATABASE orders OWNER notify;
CREATE DATABASE payments OWNER notify;
CREATE DATABASE deliveries OWNER notify;
CREATE DATABASE moderation OWNER notify;
