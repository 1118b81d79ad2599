// Package baton gives a job scheduler PowerJob-style server high
// availability on etcd.
//
// A scheduler has many apps. Each app is served by exactly one scheduler
// server at a time, and the app's workers must always find that server,
// even when servers crash, hang or lose the network. PowerJob keeps the
// answer in a SQL table and has every worker poll for it every 10 seconds,
// so a failover takes 5 to 40 seconds and two servers can believe they own
// the same app. baton keeps PowerJob's model and its HTTP protocol and puts
// etcd underneath: one lease per server, a per-app mutex, a lease-bound
// owner key that carries a fencing token, and workers that watch that key.
//
// # Packages
//
//   - coord: key layout, app registry, records, the lease-guarded Session,
//     membership and the successor choice, Dial for etcd clients.
//   - coord/embedded: etcd inside the process, for tests and demos; the
//     only package that links etcd's server.
//   - election: per-app election on a server, with fencing and handover.
//   - server: a scheduler server node with PowerJob's HTTP endpoints.
//   - worker: the worker's discovery loop.
//
// # Lifecycles
//
// One rule for every long-lived thing. A constructor that takes a context
// (coord.NewSession, coord.WatchMembers, election.New, embedded.Start)
// returns it running, or fails. One that takes none (server.NewNode,
// worker.New) only validates its configuration; Start(ctx) starts it,
// once. What holds something in etcd — a lease, keys bound to it — closes
// with Close(ctx) error, the context bounding the release (Session,
// Elector, Node); what holds only goroutines and watches closes with
// Close(), which cannot fail (Discovery, Members; embedded.Etcd's Close
// reports a directory it could not remove). Every Close is idempotent,
// waits for everything it started, and takes the metrics it registered
// out of their registry.
//
// # Keyspace
//
// Everything lives under one prefix, /baton by default:
//
//	{p}/apps/seq                  last allocated app id (no lease)
//	{p}/apps/names/{escaped name} app record {"id","name","createdAt"}
//	{p}/apps/ids/{id}             the same record
//	{p}/current-server/{appId}    owner record {"serverId","protocols","ttlMillis","acquiredAt"}, owner's lease
//	{p}/locks/{appId}/            the app's concurrency.Mutex (taken to overwrite an existing owner key), electing server's lease
//	{p}/servers/{serverId}        server record, that server's lease
//	{p}/displaced/{appId}/{lease} displacement marker {"serverId","token"}, the displaced owner's lease
//
// The fencing token of an ownership is the ModRevision of its owner key.
// An ownership never rewrites its own record, so a write that compares the
// owner key's ModRevision with the token succeeds only while that
// ownership lasts, and tokens strictly increase for each app. (The one
// rewrite by the same server — taking an app back after a rebalancing
// move whose answer was lost — starts a new ownership under a new token,
// after the old one ended.)
//
// A server that takes an app from an owner that is alive in etcd but does
// not answer pings overwrites its owner key, and in the same Txn writes a
// displacement marker bound to the displaced owner's lease. No server acts
// for an app while any marker for it exists. The displaced owner deletes
// its marker once its watch has shown the overwrite and its ownership is
// over; otherwise the marker goes when etcd expires that lease, which the
// guard makes happen only after the displaced owner stopped. The
// obligation to wait for the old owner is thus kept by etcd, not by the
// memory of the server that displaced it: if that server crashes, is cut
// off or closes during the wait, whoever comes next waits just as long.
//
// # Guarantees
//
//  1. No overlap: for every app, the ownership intervals of different
//     servers never overlap, under crashes, pauses, partitions, etcd
//     member or leader loss, lost responses, host suspend, and any
//     composition of these. Each server stops acting, by its own clock,
//     before etcd can hand its apps to anyone else (see coord.Session);
//     the clock counts time the host spent suspended (CLOCK_BOOTTIME on
//     Linux). Tokens strictly increase for each app.
//  2. Liveness: after a fault heals or a server dies, every app has an
//     owner within TTL + 1 s, and connected workers follow within 100 ms
//     of the owner key changing.
//  3. Nothing leaks: Close stops every goroutine, revokes the lease and
//     leaves no key of its own behind; bad input never writes outside the
//     prefix.
//
// # Example
//
// Start an embedded etcd, register an app and open a guarded session:
//
//	etcd, err := embedded.Start(embedded.Config{})
//	if err != nil { ... }
//	defer etcd.Close()
//	registry, err := coord.NewRegistry(etcd.Client(), coord.DefaultPrefix)
//	app, err := registry.Register(ctx, "my-app")
//	session, err := coord.NewSession(ctx, coord.SessionConfig{Client: etcd.Client()})
//	defer session.Close(ctx)
//	epoch := session.Epoch()
//	if epoch.Check() == nil {
//		// act as owner until <-epoch.Done()
//	}
//
// examples/quickstart runs the whole thing.
package baton
