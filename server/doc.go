// Package server is a scheduler server node for baton: it joins the
// cluster (a guarded etcd session and a membership key), runs the per-app
// election, and answers PowerJob's HTTP endpoints so that PowerJob's own
// workers, and baton's, can find the owner of their app.
//
// # Two kinds of address
//
// A node has one control address (Config.Control, or its Listen
// address), where baton's endpoints answer: PowerJob's web port (7700),
// the address to put in workers' server lists, and where peers ping it.
// It also has a transport address per protocol (Config.Protocols: HTTP,
// AKKA or any name), where the scheduler itself receives its workers'
// traffic (heartbeats, status and log reports; PowerJob's 10010 and
// 10086). A worker's acquire is answered with the owner's transport
// address for the protocol it names; both are in the owner and server
// records, each with an external (NAT) variant.
//
// # Endpoints
//
// Every answer is PowerJob's ResultDTO, {"success":bool,"data":...,
// "message":string}, with no other field (PowerJob workers before 4.3.8
// reject unknown ones).
//
//	GET      /server/assert?appName=          data: the app id (a number)
//	GET      /server/assertV2?appName=        data: {"appId","appName"}
//	GET      /server/acquire?protocol=&appId=&currentServer=
//	                                          data: the owner's transport address for protocol
//	GET/POST /friend/ping                     data: this server's transport addresses
//	GET      /server/hello                    data: PowerJob's fields, then baton's (owned apps and tokens, lease state)
//	GET      /server/checkConnectivity?targetIp=&targetPort=
//	                                          data: whether a PowerJob worker answers there
//
// With Config.AdminToken set, requests carrying "Authorization: Bearer
// <token>" may also use POST /admin/apps?appName= (register), GET
// /admin/owners, POST /admin/handover?appId=, POST /admin/drain and POST
// /admin/cordon, /admin/uncordon (see Node.Cordon) and GET /admin/servers
// (the live servers, their weights and how many apps each owns); without
// a token those routes do not exist (404).
//
// # PowerJob compatibility
//
// What a PowerJob worker (releases 4.3.0 to 5.1.1) sends, how it takes the
// answer, and what baton does. Its HTTP client connects for 1 s and reads
// for 5 s; any status but 200 is an exception. The replay fixture in this
// package's tests (powerjob_replay_test.go) sends each row's requests as
// each release line does, with etcd healthy, frozen and cut off.
//
//	endpoint           worker sends / takes                       baton
//	assert             at start, each listed server in turn, 3    a known app: its id, from a cache loaded
//	                   tries 100 ms apart. success:true: the id   at Start, with no etcd request. Unknown, or
//	                   (4.3.0-4.3.5: a number only). success:     a name baton could never register: 200,
//	                   false or a non-200 status: the worker      success:false, "app(...) is not registered!".
//	                   does not start. A connection error,        Not started, or etcd cannot tell within
//	                   timeout or unparsable body: next server.   Answer/2 (2 s): the connection is dropped,
//	                                                              so the worker asks its next server.
//	acquire            every 10 s: protocol (AKKA by default),    the owner's transport address for the
//	                   appId, currentServer once known; the       protocol, electing one if none is alive,
//	                   current server's host first, then the      within HTTPTimeouts.Answer (4 s); past it,
//	                   list. Anything but success:true with an    or without a confirmed lease, an unknown app
//	                   address: next server.                      or protocol: 200, success:false. No protocol
//	                                                              means AKKA, as in PowerJob. currentServer
//	                                                              may be an unbracketed IPv6 host:port.
//	checkConnectivity  4.3.9 on, at start, for each of its        dials the target and expects the line
//	                   addresses: true picks that address.        "pong" within 2 s. Only the requester's own
//	                                                              IP unless Config.CheckOfferedAddresses (see
//	                                                              there for what that exposes); at most 20
//	                                                              checks a second.
//	hello              (operators)                                PowerJob's fields (localHost, serverInfo,
//	                                                              serverTime "2006-01-02 15:04:05",
//	                                                              serverTimeTs, serverTimeZone, appIds,
//	                                                              defaultAddress), then baton's.
//	workerHeartbeat,   sent to the address acquire returned       not baton's: the scheduler's own transport
//	reportInstance...  (POST for HTTP; AKKA messages)             listener receives them (examples/scheduler).
//
// A PowerJob worker puts appName into the URL unencoded: the node reads
// "+" and ";" in it literally (not as a space and a separator), so any
// registered name works except one holding "&" or "#", which a PowerJob
// worker cannot send (baton's own worker encodes every name).
//
// # Differences from PowerJob
//
//   - /server/acquire never trusts the worker's currentServer: PowerJob
//     answers "yes, it is me" without checking for a share of requests
//     (accurateSelectServerPercentage); baton answers from its ownership
//     table, which its guard keeps true, at no extra cost.
//   - A protocol the owner does not offer is an error (success:false), not
//     a fallback to another, and a live owner is never deposed because it
//     lacks a protocol.
//   - Peers ping each other's control address over HTTP (/friend/ping,
//     data: the transport addresses as JSON), not through the transport:
//     only baton servers ping baton servers.
package server
