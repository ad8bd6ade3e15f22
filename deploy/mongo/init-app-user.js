// Runs once, when the `mongo` service starts on an empty data volume (the image runs
// /docker-entrypoint-initdb.d/ then): creates the application's user. The pipeline runs, the
// sensor and the CDC watcher connect as this user (MONGO_URI in docker-compose.yml); the root
// user is for operations. Changing MONGO_APP_PASSWORD later needs db.changeUserPassword().
const user = process.env.MONGO_APP_USER;
const password = process.env.MONGO_APP_PASSWORD;
if (!user || !password) {
  throw new Error("MONGO_APP_USER and MONGO_APP_PASSWORD must be set (see .env.example)");
}
const databases = [
  process.env.MONGO_DATABASE || "twin",
  process.env.FEATURES_DATABASE || "twin_features",
];
// readWrite covers change streams on these databases; dbAdmin lets the code create indexes and
// enable pre-/post-images on its collections.
db.getSiblingDB("admin").createUser({
  user: user,
  pwd: password,
  roles: databases.flatMap((name) => [
    { role: "readWrite", db: name },
    { role: "dbAdmin", db: name },
  ]),
});
print(`created user ${user} (readWrite, dbAdmin on ${databases.join(", ")})`);
