// Package election runs PowerJob's per-app server election on etcd, on
// one server's coord.Session, with fencing, safe takeover and handover.
//
// # Ownership
//
// A server owns an app while {p}/current-server/{appId} holds its owner
// record bound to its lease. The key is written once per ownership, in a
// Txn guarded by the ModRevision the election read (0 for a key that did
// not exist); that ModRevision is the ownership's fencing token, and
// Fence turns it into a comparison for the owner's own Txns. Tokens of an
// app strictly increase, because every ownership change is a new write.
//
// The compare is what makes an election exclusive: of contenders that
// read the same key, one writes and the others fail and, retrying, find
// it. To overwrite an existing key (a dead or unanswering owner) an
// election first takes the app's concurrency.Mutex and writes under it,
// releasing it in the same Txn: the mutex queues the contenders for one
// app, so that the servers a crowd of workers asked do not all ping the
// old owner, write and retry at once. Creating a key that does not exist
// — an app nobody owns, the common case at a cold start — takes no
// mutex, and no read before it: an election's first request is a Txn
// that creates the key if it is absent (compare ModRevision 0, and the
// app registered) and otherwise reads it, so such an election is one
// request and one raft commit.
//
// Every server keeps a table of all owner keys from one watch of
// {p}/current-server/ and reports that watch's progress to its session, so
// that a confirmation of the session's guard also proves the server has
// seen every write to its owner keys up to the confirming read. An
// ownership is acting (its OnAcquire context alive) only while the
// session's epoch is live: when the guard fires, every context is
// cancelled before etcd could give the app to anyone else; when
// confirmations resume and the key is unchanged, the same token is taken
// back (a new OnAcquire) without an election and without any write that
// workers would see.
//
// # Taking an app from another server
//
// Elect pings a foreign owner (Config.Pinger) before taking its app; a
// server that did not answer is not pinged again by this server's other
// elections for one PingTimeout. If the owner is alive in etcd but does
// not answer (or its record cannot be decoded — corrupt, or from a newer
// baton), Elect overwrites its key, and in the same Txn writes a
// displacement marker, {p}/displaced/{appId}/{leaseHex}, bound to the
// displaced owner's lease. Workers are sent to the new owner at once.
//
// No server acts for an app while any marker for it exists: an ownership
// becomes active only when this server's table — kept by its one watch of
// owner keys and markers together — shows its own key at its token and no
// marker for the app. The displaced owner deletes its marker (guarded by
// the marker's ModRevision) after its watch has shown the overwrite and
// its ownership's context is cancelled; a new owner then starts within
// milliseconds. If the displaced owner cannot reach etcd, the marker goes
// when etcd expires its lease, which its guard makes happen only after it
// stopped. Since the obligation lives in etcd, it survives the crash,
// partition or Close of the server that wrote the marker, and binds a
// successor, a restarted server and a handover alike.
//
// A deleted owner key, by contrast, proves that its owner has stopped —
// its lease expired after its guard fired, or it resigned after
// cancelling its work — so the successor starts at once, unless a marker
// left from an earlier displacement still holds the app.
//
// # Successors and handover
//
// When an owner key is deleted, the live server that ranks first for the
// app by weighted rendezvous hashing (coord.RankWeighted over the
// membership records' placement weights; a cordoned server weighs 0), not
// counting the server that just left, elects itself at once — no worker
// has to ask. A successor takes the orphans of a server that died (its
// lease's end deletes all its keys in one revision) up to 64 to a Txn,
// each put only if its key is still absent: the compare an election makes
// under the app's mutex after reading the key absent. The mutex does not
// make elections exclusive — that compare does; it only queues one app's
// contenders so that they do not all retry. An election racing such a
// Txn fails its compare and, retrying, finds the successor's live key;
// the Txn, racing an election that wrote first, fails as a whole, and its
// apps are elected one by one. Resign
// ends the ownership first and then deletes the key. HandOver ends it and
// then writes the successor's owner record over its own, bound to the
// successor's lease and naming the token it replaces (HandedOverFrom): the
// successor acts at once, and workers see one change of owner instead of
// a deletion and then a new owner (falling back to the deletion if the
// successor's lease is gone). Close hands over every owned app that way,
// 64 to a Txn, and waits for the successors. An ownership still held back
// by a marker is handed on at once: the marker holds its successor back
// in turn.
//
// A server that gave an app up to release its key (Resign, HandOver,
// Close, a rebalancing move, passing on a key placed on it) never owns
// that key's token again. The release's Txn may reach etcd at any moment
// — its answer lost, etcd restarting, the resignation period over — and
// whoever it names acts at once; an ownership taken up again under the
// same token would act beside it until its watch caught up. Meanwhile
// Elect sends workers to the successor, the release is retried every
// second until it is made or the key changes, and only a new write —
// another server's, or the server's own fence after a move whose answer
// was lost (see Rebalancing) — gives the app back.
//
// # Placement
//
// Elect makes the asked server the owner of an app nobody owns, as
// PowerJob does; workers all asking the first server of one list then pile
// every app on it. Place puts the app on its preferred live server
// instead: the asked server pings the servers in the app's weighted rank
// and, for the first that answers as itself, writes that server's owner
// record, bound to that server's lease (read from its membership key),
// in the very Txn an election writes its own: under the app's mutex,
// guarded by the owner key's ModRevision as read, with the displaced
// owner's marker when it overwrites a live key. Nothing else changes: the
// placed server owns any key naming it under its lease, and acts once its
// own watch shows the key and no marker — as after a handover, but with
// no HandedOverFrom, since nobody handed anything. If its lease ended in
// between, the put fails and the election is retried. A server that is
// resigning the app (it gave it up less than 2×TTL ago) passes a key
// placed on it on to its successor, so that no key names an owner that
// will not act. The asked server answers the worker with the placed
// server's address at once. Placing rather than electing-then-handing-
// over costs one write, and the asked server never acts for the app. The
// Txn also proves the placed server still a member under that lease, so a
// server that has left the set (it is draining) is never given an app.
//
// # Rebalancing
//
// With Config.Rebalance, a server moves the apps it owns whose preferred
// server is now another one: after a server joined, left, changed weight
// or was cordoned. It waits until its view of the live-server set has
// been unchanged for RebalanceSettle (10 s): a server that keeps joining
// and leaving moves nothing, and every server it moves apps to has been a
// member at least that long. It moves only to a server of positive weight
// that answers a ping as itself with its guard confirmed (PingReply), and
// at most RebalanceRate (2%) of the apps it owned when the round began,
// per second, spread over 100 ms ticks (one token bucket across rounds),
// at most 64 to a Txn. A move is a HandOver's transfer:
// the server stops acting first, then writes the new owner's record over
// its own, bound to the new owner's lease and guarded by its token, so
// workers see one change and the new owner acts at once; OnLose gets
// ReasonRebalanced. That Txn also compares every membership key's
// ModRevision with the revision of the view the move was planned on: a
// server that joined or changed weight since makes the move fail. A move
// that was not made is undone: a key that still holds its token was not
// moved and nobody else can have owned the app meanwhile. If the move's
// Txn failed, the server owns the key again under that token, as after a
// pause of its guard; if its answer was lost, etcd may still apply it
// later, so the server first fences it off by rewriting the key with its
// own record (guarded by the token) and owns the app under the new token.
// It plans afresh once the set has settled again. A
// server that left cannot change an app's first
// choice (rendezvous hashing), and the target's own membership is
// compared. Since all servers compute the same preferred server from the
// same set, and none moves an app it prefers itself, one change of the
// set moves each app at most once, and only the apps whose preferred
// server changed: about 1/(N+1) of them when an (N+1)th server joins.
//
// # Callbacks
//
// OnAcquire and OnLose run per app in order, never concurrently for one
// app, each app's on a goroutine that exists only while it has callbacks
// to run. OnLose always follows its OnAcquire, Close included. The
// context OnAcquire receives is a child of the session epoch's context it
// was activated in, so it ends with that epoch by construction, whoever
// notices the end first.
//
// Never delete or write owner keys or displacement markers by hand, and
// never revoke a server's lease by hand: a server learns of a foreign write only through its
// watch, so a hand-made deletion or revoke lets the successor start before
// the old owner has stopped — by the skew between the two servers' watch
// deliveries, a few milliseconds (TestRevokedOwnerIsReplacedBySuccessors).
package election
