// Health check of the `mongo` service (docker-compose.yml), run by mongosh inside the container:
// healthy (exit 0) only once this node is the writable primary of replica set rs0, which change
// streams (the CDC watcher) need. The first check after mongod starts with --replSet finds the
// set not initiated yet and initiates it, as the root user from the container's environment.
const REPLICA_SET = "rs0";
const MEMBER = "mongo:27017"; // the service's hostname: what clients on the network resolve

let hello = db.hello();
if (!hello.setName) {
  db.getSiblingDB("admin").auth(
    process.env.MONGO_INITDB_ROOT_USERNAME,
    process.env.MONGO_INITDB_ROOT_PASSWORD,
  );
  try {
    rs.status();
  } catch (error) {
    // Anything else (e.g. NoReplicationEnabled: the image's temporary init server) is "not yet".
    if (error.codeName !== "NotYetInitialized") throw error;
    try {
      rs.initiate({ _id: REPLICA_SET, members: [{ _id: 0, host: MEMBER }] });
      print(`initiated replica set ${REPLICA_SET} with member ${MEMBER}`);
    } catch (initiateError) {
      if (initiateError.codeName !== "AlreadyInitialized") throw initiateError;
    }
  }
  hello = db.hello();
}
if (hello.setName && hello.setName !== REPLICA_SET) {
  print(`unexpected replica set ${hello.setName}; expected ${REPLICA_SET}`);
  quit(1);
}
quit(hello.isWritablePrimary ? 0 : 1);
