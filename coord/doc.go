// Package coord holds what every side of baton shares: the app registry
// (Registry), the records stored under baton's keys, the lease-guarded
// server session (Session), live-server membership and the successor
// choice, and the etcd client settings (ClientConfig, Dial). An embedded
// etcd for examples and tests is in coord/embedded.
//
// # The session and its guard
//
// A server holds one etcd lease for everything: its membership key, its
// owner keys and its mutex keys. The Session keeps that lease alive with
// confirmation rounds it runs itself, every RoundInterval (TTL/3). A round
// that starts at time t
//
//  1. sends a keepalive, which must be acknowledged with a TTL above zero,
//  2. sends a linearizable count-only read, which returns revision R, and
//  3. if the server's elector has attached its watch of the ownership
//     range, waits until the elector reports that the watch has
//     delivered everything up to R,
//     asking etcd for a progress notification to get there — and asking
//     again every RoundInterval/4 (at most 100 ms) while it waits, since
//     etcd drops, unanswered, a request that finds the watch's stream
//     unsynced or its buffer full.
//
// Such a round confirms the lease as of t: etcd cannot expire it before
// t+TTL, because the keepalive was processed after t; and no other server
// can have overwritten one of this server's owner keys before t without
// the watch showing it, because such a write has a revision at most R. The
// current Epoch then lasts until t+TTL-Margin, unless a later round
// extends it. When the deadline passes the epoch ends (Epoch.Done is
// closed), strictly before etcd could hand the server's keys to anyone
// else by expiry; Epoch.Check tells the same thing from the clock alone,
// which stays right even when the process was paused and no timer has run.
// When rounds succeed again the session starts a new Epoch on the same
// lease; when etcd has lost the lease it grants a new one, calls OnLease
// and starts an epoch on that.
//
// The linearizable read counts the whole ownership range (owner keys and
// displacement markers), which the attached watch
// covers. A watch response proves delivery up to its last event's
// revision, or — for a progress notification — its header's.
//
// The guard's deadlines are kept on CLOCK_BOOTTIME (on Linux; Go's
// monotonic clock elsewhere), which keeps counting while the host or VM is
// suspended, as etcd's lease timers do on the etcd members. Go's timers do
// not, so the guard timer never waits longer than the margin: a resumed
// server's epoch ends within a margin, and Epoch.Check refuses at once.
// Each epoch has a context (Epoch.Context) cancelled when it ends; work
// that may run only while the epoch lasts belongs under it.
//
// A lease whose rounds fail only at the watch step (keepalive and read
// succeed, the watch does not catch up) for a whole TTL in a row is given
// up: revoked, so that its keys go and other servers take its apps — etcd
// would keep it forever, and with it a server that cannot act — and a new
// lease is started, as after a loss. Rounds failing at the keepalive or
// the read (etcd slow or unreachable) interrupt the count, so after an
// outage the watch has a full TTL to be restarted and the same lease and
// tokens continue.
//
// etcd does not count downtime against a lease: a restarted member
// recovers every lease with no expiry, and the leader of a new term gives
// each its whole TTL again plus an election timeout (lessor Promote;
// etcd 3.4 and 3.7 alike, lease checkpoints off by default and only taken
// for leases over 5 minutes). So after a full etcd outage the servers
// keep their leases, provided they reconnect within TTL plus the election
// timeout of the new leader.
//
// etcd's own client computes a lease's deadline from when a keepalive
// response arrived and checks it once a second; with a blackholed
// connection that leaves a window of most of a second in which a new owner
// and the old one both act. The guard closes it.
//
// During etcd leader changes a new leader extends every lease by its
// election timeout, so a failover can take TTL plus the election timeout.
package coord
