// Package worker is the worker side of baton: a Discovery keeps a worker
// pointed at the scheduler server that owns its app.
//
// With an etcd client, the worker reads the app's owner key and watches
// it: a put switches the worker to the new owner the moment it is written,
// with no HTTP request at all in steady state; a deletion (the owner
// resigned or died) makes it ask the app's successor — the live server
// coord.Rank puts first, the one that is taking the app over — then the
// other live servers, then the configured ones, via /server/acquire,
// after a random pause of about Jitter (the successor's put usually comes
// first, and then nobody is asked). While etcd serves the worker, only
// etcd says who the owner is: an HTTP answer can make a server elect an
// owner, never replace the one etcd names. Every Interval the worker
// re-reads the key, so that a watch that stalled silently (a half-open
// connection, a client without gRPC keepalive) is noticed.
//
// A broken watch (compaction, an etcd leader loss) is answered with a
// fresh read and a new watch, retried with jittered backoff; meanwhile
// the worker keeps its server. Only when etcd has failed it for
// EtcdGrace does it do what PowerJob's worker does: every Interval (10 s,
// starting at a random phase) it asks the current server first, then the
// configured servers (shuffled once), each up to Tries times TryPause
// apart, until etcd serves it again.
//
// Start is the same: it finds the first server in etcd, and asks the
// servers over HTTP only once etcd's connection is down or etcd has failed
// it for EtcdGrace — a fleet started at once waits for a busy etcd rather
// than adding an election's work per worker at the servers.
//
// After exactly MaxFailedRounds consecutive rounds without a server,
// OnIsolated runs once (PowerJob kills frequent jobs there — its own code
// fires on the fifth failure while its log says three); a success arms it
// again. ReportUnreachable lets the worker's own failed traffic start a
// round at once; reports of the same server in a row back off from
// TryPause to Interval.
//
//	d, err := worker.New(worker.Config{AppName: "orders", Client: etcd, Servers: []string{"10.0.0.7:7700"}})
//	if err != nil { ... }
//	if err := d.Start(ctx); err != nil { ... }
//	defer d.Close()
//	server, ok := d.Current() // lock-free; Changes() tells when it moves
package worker
