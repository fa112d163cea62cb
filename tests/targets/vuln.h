#ifndef MICROPATCH_TARGET_VULN_H
#define MICROPATCH_TARGET_VULN_H

#define PACKET_BUF_SIZE 64

int copy_packet(const char *buf, int len);

#endif
