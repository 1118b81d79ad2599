// Package worker is the worker side of baton: a Discovery keeps a worker
// pointed at the scheduler server that owns its app.
//
// With an etcd client, the worker reads the app's owner key and watches
// it: a put switches the worker to the new owner the moment it is written,
// with no HTTP request at all in steady state; a deletion (the owner
// resigned or died) makes it ask the app's successor — the live server
// coord.Rank puts first, the one that is taking the app over — then the
// other live servers, then the configured ones, via /server/acquire. A
// broken watch (compaction, leader loss) is answered with a fresh read and
// a new watch.
//
// Without etcd, or while the etcd connection has not been ready for
// EtcdGrace, the worker does what PowerJob's does: every Interval (10 s)
// it asks the current server first, then the configured servers (shuffled
// once), each up to Tries times TryPause apart. When the etcd connection
// is ready again, it reads the owner key and watches again.
//
// After exactly MaxFailedRounds consecutive rounds without a server,
// OnIsolated runs once (PowerJob kills frequent jobs there — its own code
// fires on the fifth failure while its log says three); a success arms it
// again. ReportUnreachable lets the worker's own failed traffic start a
// round at once.
//
//	d, err := worker.New(worker.Config{AppName: "orders", Client: etcd, Servers: []string{"10.0.0.7:7700"}})
//	if err != nil { ... }
//	if err := d.Start(ctx); err != nil { ... }
//	defer d.Close()
//	server, ok := d.Current() // lock-free; Changes() tells when it moves
package worker
